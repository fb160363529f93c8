"""Programs the test pods' containers run (``python -m tests.kube.apps.<name>``): the
harness in ``tests/kube/kubelet.py`` maps a container's ``python`` command to an
interpreter of this environment, since no image is ever pulled."""
