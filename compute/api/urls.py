from django.urls import path
from rest_framework.routers import DefaultRouter

from compute.api import network_views, views
from compute.desired import api as desired_api

router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("workloads", views.WorkloadViewSet, basename="workload")
router.register("hosts", views.HostViewSet, basename="host")
router.register("desired/revisions", desired_api.RevisionViewSet, basename="desired-revision")
router.register("desired/plans", desired_api.PlanViewSet, basename="desired-plan")
router.register("desired", desired_api.DesiredStateViewSet, basename="desired")
router.register("compartments", network_views.CompartmentViewSet, basename="compartment")  # issue 7
router.register("published-ports", network_views.PublishedPortViewSet, basename="published-port")  # issue 7
router.register("egress-allowances", network_views.EgressAllowanceViewSet, basename="egress-allowance")

urlpatterns = [
    path("hosts/join/", views.JoinView.as_view(), name="host-join"),
    path("hosts/blobs/<str:pk>/", views.HostBlobView.as_view(), name="host-blob"),
    *router.urls,
]
