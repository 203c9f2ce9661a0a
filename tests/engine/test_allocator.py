"""The glibc malloc settings: applied unless the environment sets them or turns them off."""

import platform

import pytest

from tensorpoly_ds.engine.allocator import DISABLE, SETTINGS, configure_malloc

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")


@glibc
def test_settings_applied_unless_set_in_the_environment_or_disabled():
    assert configure_malloc({}) == {name: value for name, (_, value) in SETTINGS.items()}
    assert configure_malloc({"MALLOC_MMAP_THRESHOLD_": "65536"}) == {"MALLOC_TRIM_THRESHOLD_": 1 << 20}
    assert configure_malloc({DISABLE: "0"}) == {}
