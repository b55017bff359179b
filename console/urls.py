"""URL root: the ledger app, and Django's login / logout views."""
from django.contrib.auth import views as auth_views
from django.urls import include, path

from tracecode.console.ledger.login import ThrottledLoginForm

urlpatterns = [
    # Failed logins are counted per name and per address (ledger/login.py).
    path("login/", auth_views.LoginView.as_view(template_name="ledger/login.html",
                                                authentication_form=ThrottledLoginForm), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("", include("tracecode.console.ledger.urls")),
]
