"""UI routes of the desired pages (included by frontend/urls.py)."""

from django.urls import URLPattern, path

from frontend import views_desired

urlpatterns: list[URLPattern] = [
    path("desired/", views_desired.desired, name="desired"),
    path("desired/mode/", views_desired.desired_mode, name="desired-mode"),
    path("desired/validate/", views_desired.desired_validate, name="desired-validate"),
    path("desired/save/", views_desired.desired_save, name="desired-save"),
    path("desired/plan/", views_desired.desired_plan, name="desired-plan"),
    path("desired/plans/<uuid:pk>/apply/", views_desired.desired_apply, name="desired-apply"),
    path("desired/revisions/<uuid:pk>/", views_desired.desired_revision, name="desired-revision"),
    path("desired/revisions/<uuid:pk>/rollback/", views_desired.desired_rollback, name="desired-rollback"),
]
