"""Bundled environments; each module registers itself with :func:`offpolicy.rollout.env.register_env`."""
