from django.urls import path
from rest_framework.routers import DefaultRouter

from backups.api import views

router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("backups", views.BackupViewSet, basename="backup")
router.register("backup-schedules", views.BackupScheduleViewSet, basename="backup-schedule")

urlpatterns = [
    path(
        "hosts/backup-manifests/<str:pk>/",
        views.HostBackupManifestView.as_view(),
        name="host-backup-manifest",
    ),
    path("hosts/backup-missing/", views.HostBackupMissingView.as_view(), name="host-backup-missing"),
    path("hosts/backup-chunks/<str:pk>/", views.HostBackupChunkView.as_view(), name="host-backup-chunk"),
    *router.urls,
]
