"""Provisioning stamps: `stamp create` (a new stamp at the fleet's revision, registered once it matches)
and stamps as code (`fleet plan` / `fleet apply` of a declarative file)."""
