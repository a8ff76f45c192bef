import django_filters

from portal.models import Operation
from tenants.models import AuditEntry, Membership


class AuditEntryFilterSet(django_filters.FilterSet):
    actor = django_filters.CharFilter(field_name="actor__username")
    action = django_filters.CharFilter()
    action_prefix = django_filters.CharFilter(field_name="action", lookup_expr="startswith")
    since = django_filters.IsoDateTimeFilter(field_name="time", lookup_expr="gte")
    until = django_filters.IsoDateTimeFilter(field_name="time", lookup_expr="lt")

    class Meta:
        model = AuditEntry
        fields = ["actor", "action", "outcome", "tenant", "object_type", "object_id", "request_id"]


class MembershipFilterSet(django_filters.FilterSet):
    class Meta:
        model = Membership
        fields = ["tenant", "role"]


class OperationFilterSet(django_filters.FilterSet):
    class Meta:
        model = Operation
        fields = ["tenant", "state", "kind", "target_type", "target_id"]
