"""Shared test helpers: numerics (tolerances, assert_close), tiny-model factories, training argv and
shapes data, the torchvision stand-in, distributed workers and sm_90 compile checks."""
