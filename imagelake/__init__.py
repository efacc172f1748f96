"""The top of the stack: the ``imagelake`` console script, the production server and the demo.

This package is the only one allowed to import every layer (lake ← jobs ← api ← dashboards).
"""
