import hashlib
import json
import os

import django
from django.conf import settings
from django.db import connection
from django.db.migrations.recorder import MigrationRecorder
from django.http import HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404
from django.templatetags.static import static
from django.views.decorators.csrf import csrf_exempt

from guestbook.models import Entry

VERSION = "1"


def schema():
    """The newest migration of this app applied to the database."""
    applied = [name for app, name in MigrationRecorder(connection).applied_migrations()
               if app == "guestbook"]
    return max(applied, default="")


def index(request):
    return JsonResponse({
        "version": VERSION,
        "release": os.environ.get("BLUEGREEN_RELEASE", ""),
        "django": django.get_version(),
        "schema": schema(),
        "stylesheet": static("guestbook/site.css"),
        "secret_fingerprint": hashlib.sha256(settings.SECRET_KEY.encode()).hexdigest()[:12],
        "server": request.META.get("SERVER_SOFTWARE", ""),
    })


def health(request):
    return HttpResponse("ok", content_type="text/plain")


def describe(entry):
    return {"id": entry.id, "text": entry.text, "release": entry.release}


@csrf_exempt
def entries(request):
    if request.method != "POST":
        return JsonResponse({"entries": [describe(e) for e in Entry.objects.order_by("id")]})
    body = json.loads(request.body)
    entry = Entry.objects.create(text=body["text"], release=os.environ.get("BLUEGREEN_RELEASE", ""))
    return JsonResponse(describe(entry), status=201)


def entry(request, entry_id):
    return JsonResponse(describe(get_object_or_404(Entry, id=entry_id)))
