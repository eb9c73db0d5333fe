"""analysis: see xattn_utils/__init__.py and the README's module map."""
