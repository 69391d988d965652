from django.db import models


class Entry(models.Model):
    text = models.CharField(max_length=500)
    release = models.CharField(max_length=40, blank=True)
    created = models.DateTimeField(auto_now_add=True)
