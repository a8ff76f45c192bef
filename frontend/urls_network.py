"""UI routes of the network pages (included by frontend/urls.py)."""

from django.urls import URLPattern, path

from frontend import views_network as v

urlpatterns: list[URLPattern] = [
    path("networks/", v.compartments, name="compartments"),
    path("networks/create/", v.compartment_create, name="compartment-create"),
    path("networks/<uuid:pk>/", v.compartment_detail, name="compartment-detail"),
    path("networks/<uuid:pk>/delete/", v.compartment_delete, name="compartment-delete"),
    path("networks/<uuid:pk>/publish/", v.compartment_publish, name="compartment-publish"),
    path("networks/ports/<uuid:pk>/unpublish/", v.port_unpublish, name="port-unpublish"),
]
