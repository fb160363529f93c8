"""Commands that ask a running mesh what is wrong: ``trellis check``, ``trellis proxy
status|config`` and ``trellis policy explain``.

Every answer comes from the processes themselves (the CA's admin socket, the agent's and
the sidecars' admin ``/config``, the API server), never from what a configuration file
says should be running; ``checks`` holds the checks as pure functions of those answers.
"""
