"""URL configuration for mysite project."""

from django.urls import path
from guestbook import views

urlpatterns = [
    path("", views.index),
    path("health", views.health),
    path("entries", views.entries),
    path("entries/<int:entry_id>", views.entry),
]
