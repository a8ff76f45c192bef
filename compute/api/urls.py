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
    path(
        "hosts/self/workloads/<str:pk>/commit/",
        host_views.HostCommitView.as_view(),
        name="host-self-workload-commit",
    ),
    path(
        "hosts/self/workloads/<str:pk>/commit/layer/",
        host_views.HostCommitLayerView.as_view(),
        name="host-self-workload-commit-layer",
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
    # Volumes, snapshots and backups on the calling host (issue 17).
    path(
        "hosts/self/volume-operations/",
        host_views.HostVolumeOperationsView.as_view(),
        name="host-self-volume-operations",
    ),
    path(
        "hosts/self/volume-operations/<str:pk>/",
        host_views.HostVolumeOperationView.as_view(),
        name="host-self-volume-operation",
    ),
    path(
        "hosts/self/volume-operations/<str:pk>/resume/",
        host_views.HostVolumeOperationResumeView.as_view(),
        name="host-self-volume-operation-resume",
    ),
    path("hosts/self/volumes/<str:pk>/", host_views.HostVolumeView.as_view(), name="host-self-volume"),
    path("hosts/self/snapshots/<str:pk>/", host_views.HostSnapshotView.as_view(), name="host-self-snapshot"),
    path("hosts/self/volume-pool/", host_views.HostVolumePoolView.as_view(), name="host-self-volume-pool"),
    path("hosts/self/volume-usage/", host_views.HostVolumeUsageView.as_view(), name="host-self-volume-usage"),
    path("hosts/self/backups/<str:pk>/", host_views.HostBackupView.as_view(), name="host-self-backup"),
    path(
        "hosts/self/backups/<str:pk>/missing/",
        host_views.HostBackupMissingView.as_view(),
        name="host-self-backup-missing",
    ),
    path(
        "hosts/self/backups/<str:pk>/chunks/<str:digest>/",
        host_views.HostBackupChunkView.as_view(),
        name="host-self-backup-chunk",
    ),
    path(
        "hosts/self/backups/<str:pk>/manifests/<str:digest>/",
        host_views.HostBackupManifestUploadView.as_view(),
        name="host-self-backup-manifest-upload",
    ),
    path(
        "hosts/self/backups/<str:pk>/manifest/",
        host_views.HostBackupManifestView.as_view(),
        name="host-self-backup-manifest",
    ),
    *router.urls,
]
