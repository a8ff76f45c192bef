import django_filters

from imaging.models import Image


class ImageFilterSet(django_filters.FilterSet):
    name = django_filters.CharFilter()
    name_contains = django_filters.CharFilter(field_name="name", lookup_expr="icontains")
    public = django_filters.BooleanFilter(field_name="tenant", lookup_expr="isnull")

    class Meta:
        model = Image
        fields = ["name", "tag", "tenant", "source", "manifest_digest", "state"]
