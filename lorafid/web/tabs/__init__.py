"""The dashboard's tabs, one module each: layout, handlers, and the words and helpers only that tab uses.

Each module defines a mixin class of ``lorafid.web.app.Dashboard`` (weight audit, its adapter
section, provider check, behaviour, published results) whose class body lists the shared
attributes it reads; ``common`` holds what every tab uses (the error boundary, input limits).
A tab never imports ``lorafid.web.app``: what it needs comes through the Dashboard's attributes.
"""
