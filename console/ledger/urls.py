from django.urls import path

from . import pharmacy, public, views

urlpatterns = [
    path("", views.lead_list, name="lead-list"),
    path("search/person", views.person_search, name="person-search"),
    path("leads/<str:ref>/", views.lead_detail, name="lead-detail"),
    path("leads/<str:ref>/assign", views.lead_assign, name="lead-assign"),
    path("leads/<str:ref>/transition", views.lead_transition, name="lead-transition"),
    path("leads/<str:ref>/report", views.lead_report, name="lead-report"),
    path("leads/<str:ref>/note", views.lead_note, name="lead-note"),
    path("leads/<str:ref>/action", views.lead_action, name="lead-action"),
    path("leads/<str:ref>/inspection", views.lead_inspection, name="lead-inspection"),
    path("leads/<str:ref>/sanction", views.lead_propose, name="lead-propose"),
    path("sanctions/<uuid:request_id>/approve", views.sanction_approve, name="sanction-approve"),
    path("sanctions/<uuid:request_id>/reject", views.sanction_reject, name="sanction-reject"),
    path("sanctions/<uuid:request_id>/retry", views.sanction_retry, name="sanction-retry"),
    path("sanctions/<uuid:request_id>/lift", views.sanction_lift, name="sanction-lift"),
    path("sanctions/<uuid:request_id>/lift/approve", views.sanction_lift_approve, name="sanction-lift-approve"),
    path("sanctions/<uuid:request_id>/lift/reject", views.sanction_lift_reject, name="sanction-lift-reject"),
    path("import/", views.imports, name="imports"),
    path("reports/weekly/", views.weekly, name="weekly"),
    path("reports/weekly.xlsx", views.weekly_xlsx, name="weekly-xlsx"),
    path("reports/weekly/submit", views.weekly_submit, name="weekly-submit"),
    path("reports/effectiveness/", views.effectiveness, name="effectiveness"),
    path("reports/effectiveness.xlsx", views.effectiveness_xlsx, name="effectiveness-xlsx"),
    path("reports/effectiveness.csv", views.effectiveness_csv, name="effectiveness-csv"),
    path("models/", views.model_configs, name="model-configs"),
    path("models/propose", views.model_config_propose, name="model-config-propose"),
    path("models/<int:pk>/adopt", views.model_config_adopt, name="model-config-adopt"),
    path("models/<int:pk>/reject", views.model_config_reject, name="model-config-reject"),
    path("models/adopted.toml", views.model_config_adopted, name="model-config-adopted"),
    path("models/conclusions.csv", views.conclusions_csv, name="conclusions-csv"),
    path("reports/snapshots/<int:pk>.xlsx", views.snapshot_xlsx, name="snapshot-xlsx"),
    path("alerts/", views.alert_overview, name="alerts"),
    path("alerts/<int:pk>/accept", views.alert_accept, name="alert-accept"),
    # The pharmacy API (pharmacy.py): JSON, the site's own tracecode token, no login.
    path("api/pharmacy/alerts", pharmacy.alert_list, name="pharmacy-alerts"),
    path("api/pharmacy/alerts/<str:alert_id>/answer", pharmacy.alert_answer, name="pharmacy-answer"),
    # The public code query (public.py): anyone, no login, rate-limited per address.
    path("query/", public.page, name="public-query"),
    path("api/query", public.api, name="public-query-api"),
]
