"""Slow compilations are logged (jmed.compilation): a lowered threshold makes every
compilation "slow", so the tests see the messages without timing anything."""

import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmed
import jmed.transforms as T
from jmed import compilation


@pytest.fixture
def log_everything(caplog):
    previous = compilation.log_slow_compilations(0.0)
    caplog.set_level(logging.WARNING, logger="jmed.compilation")
    try:
        yield caplog
    finally:
        compilation.log_slow_compilations(previous)


def _messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "jmed.compilation"]


def test_a_jitted_function_is_named(log_everything):
    def shift_volume(x):
        return x + 1.0

    jax.jit(shift_volume)(jnp.zeros((3, 4, 5, 1))).block_until_ready()
    messages = [m for m in _messages(log_everything) if "shift_volume" in m]
    assert len(messages) == 1, _messages(log_everything)
    assert messages[0].startswith("compiling jit(shift_volume) took ") and messages[0].endswith(" s")
    # compiled already: nothing more
    log_everything.clear()
    jax.jit(shift_volume)(jnp.zeros((3, 4, 5, 1))).block_until_ready()
    assert not [m for m in _messages(log_everything) if "shift_volume" in m]


def _augment(transform, key, data):
    return transform(key, jmed.ScalarImage(data)).data


def test_compile_once_names_the_transforms_and_the_shape(log_everything):
    jitted = jax.jit(_augment, static_argnums=0)
    pipeline = T.Compose([T.RandomFlip(axes=(0,)), T.RandomNoise(std=0.1)])
    data = np.ones((6, 5, 4, 1), np.float32)
    key = jax.random.key(0)
    log_everything.clear()
    program = compilation.compile_once(jitted, (pipeline,), (key, data), name="the test program")
    messages = _messages(log_everything)
    # one message, from compile_once (the JAX listener keeps quiet for it)
    assert len(messages) == 1, messages
    assert messages[0].startswith(
        "compiling the test program (Compose(RandomFlip, RandomNoise)) for shape (6, 5, 4, 1) took "
    )
    np.testing.assert_array_equal(np.asarray(program(key, data)), np.asarray(jitted(pipeline, key, data)))


def test_fast_compilations_and_silenced_logs_say_nothing(caplog):
    caplog.set_level(logging.WARNING, logger="jmed.compilation")
    previous = compilation.log_slow_compilations(1e6)
    try:

        def quick_one(x):
            return x * 2.0

        jax.jit(quick_one)(jnp.ones(3)).block_until_ready()
        compilation.log_slow_compilations(None)

        def quick_two(x):
            return x * 3.0

        jax.jit(quick_two)(jnp.ones(3)).block_until_ready()
    finally:
        assert compilation.log_slow_compilations(previous) is None
    assert not _messages(caplog)


def test_threshold_settings(monkeypatch):
    for text, expected in (("", 5.0), ("2.5", 2.5), ("0", 0.0), ("off", None), ("inf", None), ("-1", None)):
        monkeypatch.setenv("JMED_COMPILE_LOG_SECONDS", text)
        assert compilation._threshold_from_environment() == expected, text
    for bad in (-1.0, "5", True, float("nan")):
        with pytest.raises(ValueError, match="seconds"):
            compilation.log_slow_compilations(bad)


_DEFAULT_LOGGING = """
import jax, jax.numpy as jnp
import jmed
jmed.ScalarImage  # first use of jmed
def slow_step(x):
    return jnp.sin(x) * 2.0
jax.jit(slow_step)(jnp.ones(4)).block_until_ready()
"""


def test_the_message_is_shown_without_logging_setup():
    env = dict(os.environ, JAX_PLATFORMS="cpu", JMED_COMPILE_LOG_SECONDS="0")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-c", _DEFAULT_LOGGING], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "compiling jit(slow_step) took" in proc.stderr
    env["JMED_COMPILE_LOG_SECONDS"] = "off"
    proc = subprocess.run(
        [sys.executable, "-c", _DEFAULT_LOGGING], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0 and "compiling" not in proc.stderr, proc.stderr
