from django.urls import path
from rest_framework.routers import DefaultRouter

from compute.api import host_views, network_views, views
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
    # The host API: a host's agent with its own credential, acting on itself only.
    path("hosts/self/", host_views.HostSelfView.as_view(), name="host-self"),
    path("hosts/self/network/", host_views.HostNetworkView.as_view(), name="host-self-network"),
    path("hosts/self/operations/", host_views.HostOperationsView.as_view(), name="host-self-operations"),
    path("hosts/self/heartbeat/", host_views.HostHeartbeatView.as_view(), name="host-self-heartbeat"),
    path("hosts/self/facts/", host_views.HostFactsView.as_view(), name="host-self-facts"),
    path("hosts/self/workloads/", host_views.HostWorkloadsView.as_view(), name="host-self-workloads"),
    path("hosts/self/workloads/<str:pk>/", host_views.HostWorkloadView.as_view(), name="host-self-workload"),
    path(
        "hosts/self/workloads/<str:pk>/state/",
        host_views.HostWorkloadStateView.as_view(),
        name="host-self-workload-state",
    ),
    path(
        "hosts/self/workloads/<str:pk>/removed/",
        host_views.HostWorkloadRemovedView.as_view(),
        name="host-self-workload-removed",
    ),
    path("hosts/self/samples/", host_views.HostSamplesView.as_view(), name="host-self-samples"),
    path(
        "hosts/self/network-repairs/",
        host_views.HostNetworkRepairsView.as_view(),
        name="host-self-network-repairs",
    ),
    path(
        "hosts/self/operations/<str:pk>/", host_views.HostOperationView.as_view(), name="host-self-operation"
    ),
    *router.urls,
]
