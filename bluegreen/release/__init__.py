"""A release, from a commit to something an instance can run.

``prepare`` is the deploy's way in: it makes a commit ready to serve. ``repository`` mirrors
the git repository and materializes a commit, ``procfile`` reads its process types, ``verify``
builds and checks it (its ``venvs`` environment, with pip's cache in ``pipcache``; each command
in a ``transient`` unit, given what ``appenv`` says every process of the app gets), and
``releases`` keeps the verified release directories; ``catalog`` reads them with the records
(rollback targets, what to keep).
"""
