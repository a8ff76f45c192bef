"""Personas and shared fixtures.

Tenant A ("acme"): owner alice, admin amir, member mia, viewer vic. Tenant B ("globex"): owner bob.
charlie belongs to no tenant; oscar is an operator. Tokens: a read-only token of mia, a token of alice
scoped to acme, a token of bob, oscar's token scoped to acme and oscar's read-only token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

PASSWORD = "correct horse battery"


@dataclass
class World:
    acme: Any
    globex: Any
    users: dict[str, Any]
    tokens: dict[str, str]

    def user(self, name: str) -> Any:
        return self.users[name]


def make_user(username: str, *, staff: bool = False) -> Any:
    from django.contrib.auth import get_user_model

    return get_user_model().objects.create_user(
        username=username, password=PASSWORD, email=f"{username}@example.test", is_staff=staff
    )


def build_world() -> World:
    # Imported here so that driver tests run without Django (`-p no:django`).
    from tenants import services
    from tenants.actors import Actor
    from tenants.choices import Role
    from tenants.models import Membership

    oscar = make_user("oscar", staff=True)
    users = {"oscar": oscar}
    for name in ("alice", "amir", "mia", "vic", "bob", "charlie"):
        users[name] = make_user(name)
    op = Actor(user=oscar)
    acme = services.create_tenant(actor=op, name="acme", display_name="Acme", owner=users["alice"])
    globex = services.create_tenant(actor=op, name="globex", display_name="Globex", owner=users["bob"])
    Membership.objects.create(user=users["amir"], tenant=acme, role=Role.ADMIN)
    Membership.objects.create(user=users["mia"], tenant=acme, role=Role.MEMBER)
    Membership.objects.create(user=users["vic"], tenant=acme, role=Role.VIEWER)
    tokens = {
        "mia_readonly": services.create_token(actor=Actor(user=users["mia"]), name="ro", read_only=True)[1],
        "alice_acme": services.create_token(actor=Actor(user=users["alice"]), name="acme", tenant=acme)[1],
        "bob": services.create_token(actor=Actor(user=users["bob"]), name="bob")[1],
        "oscar_acme": services.create_token(actor=op, name="op-acme", tenant=acme)[1],
        "oscar_readonly": services.create_token(actor=op, name="op-ro", read_only=True)[1],
    }
    return World(acme=acme, globex=globex, users=users, tokens=tokens)


@pytest.fixture
def world(db: None) -> World:
    return build_world()


def client_for(world: World, persona: str) -> Any:
    """An API client acting as a persona: a user name (session), a token name, or "anonymous"."""
    from rest_framework.test import APIClient

    client = APIClient()
    if persona in world.tokens:
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {world.tokens[persona]}")
    elif persona != "anonymous":
        client.force_authenticate(world.user(persona))
    return client


@pytest.fixture
def as_persona(world: World) -> Any:
    return lambda persona: client_for(world, persona)


@pytest.fixture(autouse=True)
def _fast_password_hashing(request: pytest.FixtureRequest) -> Any:
    """Real hashing costs ~0.3 s per user; tests create many users."""
    if request.node.get_closest_marker("django_db") is not None:
        settings = request.getfixturevalue("settings")
        settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    yield


@pytest.fixture(autouse=True)
def _compartment_pools(request: pytest.FixtureRequest) -> Any:
    """The test installation's operator lets tenants pick compartment subnets anywhere in 10.0.0.0/8."""
    if request.node.get_closest_marker("django_db") is not None:
        settings = request.getfixturevalue("settings")
        settings.BULKHEAD_COMPARTMENT_POOLS = "10.0.0.0/8"
    yield


@pytest.fixture(autouse=True)
def _clear_cache(request: pytest.FixtureRequest) -> Any:
    """Auth-failure counters live in the cache: every test starts with none."""
    from django.conf import settings

    if settings.configured and request.node.get_closest_marker("django_db") is not None:
        from django.core.cache import cache

        cache.clear()
    yield


@pytest.fixture(autouse=True)
def _fresh_channel_layer() -> Any:
    """A channel layer per test: channels-redis binds its locks to the event loop that first used them,
    and each test's async_to_sync runs another loop (a "bound to a different event loop" error)."""
    yield
    try:
        from channels.layers import channel_layers
    except ImportError:
        return
    channel_layers.backends.clear()


# Under CI a skipped test is a failure of set-up, except for these reasons, which cannot hold on the
# build machines (they have /dev/kvm, but hardware virtualization does not work there).
ALLOWED_CI_SKIP_REASONS = ("KVM does not work on this machine",)


def _under_ci() -> bool:
    import os

    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _refused_skips(config: pytest.Config) -> list[str]:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return []
    refused = []
    for report in reporter.stats.get("skipped", []):
        reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not any(allowed in reason for allowed in ALLOWED_CI_SKIP_REASONS):
            refused.append(f"{report.nodeid}: {reason}")
    return refused


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    refused = _refused_skips(config) if _under_ci() else []
    if refused:
        terminalreporter.section("skipped under CI: a set-up failure", red=True)
        for line in refused:
            terminalreporter.line(line)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _under_ci() and session.exitstatus == 0 and _refused_skips(session.config):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
