"""The ground floor every layer above may write to: the event store.

- :mod:`.events`: :class:`~bastion.store.events.EventStore` (SQLite WAL by default or
  PostgreSQL by URL; durable appends, concurrent ones sharing a commit), event kinds.

This package imports nothing of Bastion but :mod:`bastion.errors`, so ``web``,
``registry``, ``llm``, ``runtime`` and ``service`` all import it without reaching up.
"""
