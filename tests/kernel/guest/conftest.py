"""The guest suite runs only inside the QEMU guest (``tests/kernel/guest_vm.py`` sets
TRELLIS_KTLS_GUEST=1); on the host ``tests/kernel/conftest.py`` leaves it uncollected, and
``tests/kernel/test_guest.py`` boots the guest to run it."""
