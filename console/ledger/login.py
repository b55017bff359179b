"""Login throttling: failed logins are counted per user name and per client address in the
ledger's database (models.LoginThrottle), so every console process and thread counts the same
failures. A name or an address with too many failures within the window is refused before the
password is checked at all (so a guess made while locked out learns nothing), until the window
has passed since its last counted failure. Limits: settings.TRACECODE_LOGIN_* (docs/console.md)."""
from __future__ import annotations

import hashlib
from datetime import timedelta

from django import forms
from django.conf import settings
from django.contrib.auth.forms import AuthenticationForm
from django.db import IntegrityError, transaction
from django.utils import timezone

from .models import LoginThrottle


def _keys(username: str, address: str) -> list[tuple[str, int]]:
    """(key, limit) of a login: the name (hashed: what is typed at the form may be anything,
    even a password typed into the wrong box) and the address."""
    name = hashlib.sha256(username.strip().lower().encode("utf-8")).hexdigest()[:40]
    keys = [(f"user:{name}", settings.TRACECODE_LOGIN_MAX_FAILURES_USER)]
    if address:
        keys.append((f"addr:{address[:64]}", settings.TRACECODE_LOGIN_MAX_FAILURES_ADDRESS))
    return keys


def _window() -> timedelta:
    return timedelta(seconds=settings.TRACECODE_LOGIN_WINDOW_S)


def locked(username: str, address: str) -> bool:
    since = timezone.now() - _window()
    for key, limit in _keys(username, address):
        row = LoginThrottle.objects.filter(key=key).first()
        if row is not None and row.failures >= limit and row.last_at > since:
            return True
    return False


def failed(username: str, address: str) -> None:
    """Count a failure for the name and the address (a count older than the window starts again)."""
    now = timezone.now()
    # Counts long past their window are dead weight (an attack from many addresses leaves many).
    LoginThrottle.objects.filter(last_at__lt=now - max(_window(), timedelta(days=1))).delete()
    for key, _limit in _keys(username, address):
        for _ in range(3):
            try:
                with transaction.atomic():
                    row = LoginThrottle.objects.select_for_update().filter(key=key).first()
                    if row is None:
                        LoginThrottle.objects.create(key=key, failures=1, first_at=now, last_at=now)
                    elif row.last_at <= now - _window():
                        row.failures, row.first_at, row.last_at = 1, now, now
                        row.save()
                    else:
                        row.failures, row.last_at = row.failures + 1, now
                        row.save()
                break
            except IntegrityError:  # two first failures of one key at once: count again
                continue


def succeeded(username: str) -> None:
    """A good login clears the name's count (not the address's: logging in to one's own
    account between guesses at others must not reset them)."""
    LoginThrottle.objects.filter(key=_keys(username, "")[0][0]).delete()


class ThrottledLoginForm(AuthenticationForm):
    error_messages = {
        **AuthenticationForm.error_messages,
        "invalid_login": "用户名或密码不正确。",
        "throttled": "登录失败次数过多，请 %(minutes)d 分钟后再试。",
    }

    def clean(self):
        username = self.cleaned_data.get("username") or ""
        address = self.request.META.get("REMOTE_ADDR", "") if self.request is not None else ""
        if locked(username, address):
            raise forms.ValidationError(self.error_messages["throttled"], code="throttled",
                                        params={"minutes": max(1, settings.TRACECODE_LOGIN_WINDOW_S // 60)})
        try:
            cleaned = super().clean()
        except forms.ValidationError as exc:
            if exc.code == "invalid_login":
                failed(username, address)
            raise
        succeeded(username)
        return cleaned
