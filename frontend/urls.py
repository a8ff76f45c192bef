from django.urls import path

from frontend import views

urlpatterns = [
    path("login/", views.login_view, name="login"),
    path("logout/", views.logout_view, name="logout"),
    path("", views.dashboard, name="dashboard"),
    path("switch-tenant/", views.switch_tenant, name="switch-tenant"),
    path("selfcheck/", views.selfcheck_start, name="selfcheck-start"),
    path("members/", views.members, name="members"),
    path("members/add/", views.member_add, name="member-add"),
    path("members/<int:pk>/role/", views.member_role, name="member-role"),
    path("members/<int:pk>/remove/", views.member_remove, name="member-remove"),
    path("tokens/", views.tokens, name="tokens"),
    path("tokens/create/", views.token_create, name="token-create"),
    path("tokens/<uuid:pk>/revoke/", views.token_revoke, name="token-revoke"),
    path("audit/", views.audit_log, name="audit"),
    path("operations/", views.operations_list, name="operations"),
    path("tenants/", views.tenants, name="tenants"),
    path("tenants/create/", views.tenant_create, name="tenant-create"),
    path("users/", views.users, name="users"),
    path("users/create/", views.user_create, name="user-create"),
]
