"""WSGI entry point (waitress in `tracecode console serve`, or any WSGI server)."""
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tracecode.console.settings")
application = get_wsgi_application()
