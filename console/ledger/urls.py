from django.urls import path

from . import views

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
    path("reports/snapshots/<int:pk>.xlsx", views.snapshot_xlsx, name="snapshot-xlsx"),
]
