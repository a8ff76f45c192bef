from django.urls import path
from rest_framework.routers import DefaultRouter

from compute.api import views

router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("workloads", views.WorkloadViewSet, basename="workload")
router.register("hosts", views.HostViewSet, basename="host")

urlpatterns = [
    path("hosts/join/", views.JoinView.as_view(), name="host-join"),
    *router.urls,
]
