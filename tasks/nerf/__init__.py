"""NeRF backends. Importing this package registers the built-in ones (see ``base.get_backend``)."""

from tasks.nerf import ngp  # noqa: F401  (registers "ngp")
