"""The three roles as Django groups with the permissions of rules.ROLES; `has(user, perm)` is the
one check every view and workflow step makes."""
from __future__ import annotations

from .rules import ROLES, Perm


def ensure_roles() -> None:
    """Create or update the role groups (after every migrate; idempotent)."""
    from django.contrib.auth.models import Group, Permission
    from django.contrib.contenttypes.models import ContentType

    from .models import Lead

    ct = ContentType.objects.get_for_model(Lead)
    perms = {p.value: Permission.objects.get_or_create(codename=p.value, content_type=ct,
                                                       defaults={"name": p.value})[0] for p in Perm}
    for name, role in ROLES.items():
        group, _ = Group.objects.get_or_create(name=name)
        group.permissions.set([perms[p.value] for p in role.perms])


def has(user, perm: Perm) -> bool:
    return bool(user and user.is_authenticated and user.is_active and user.has_perm(f"ledger.{perm.value}"))


def role_of(user) -> str:
    names = set(user.groups.values_list("name", flat=True)) if user.is_authenticated else set()
    for name in ("supervisor", "inspector", "auditor"):
        if name in names:
            return name
    return ""


def make_user(username: str, password: str, role: str):
    """Create (or reset) a console user in one role. The password must pass Django's
    AUTH_PASSWORD_VALIDATORS (django.core.exceptions.ValidationError otherwise), checked
    before anything is written."""
    from django.contrib.auth.models import User
    from django.contrib.auth.password_validation import validate_password
    from django.db import transaction

    if role not in ROLES:
        raise ValueError(f"role {role!r}: one of {', '.join(ROLES)}")
    ensure_roles()
    existing = User.objects.filter(username=username).first()
    validate_password(password, existing or User(username=username))
    with transaction.atomic():
        return _save_user(username, password, role)


def _save_user(username: str, password: str, role: str):
    from django.contrib.auth.models import Group, User

    user, _ = User.objects.get_or_create(username=username)
    user.set_password(password)
    user.is_active = True
    user.save()
    user.groups.set([Group.objects.get(name=role)])
    return user
