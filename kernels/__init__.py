"""The C++ sources of the CPU kernels. A package (``trellis.kernels``, as setup.py maps it) only so
that ``importlib`` finds them alike in a checkout's editable install and in an installed wheel."""
