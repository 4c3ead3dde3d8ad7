"""The VTAB-1k application built on the library: tasks and data, the decoded-image cache, run settings, the
training engine, learning-rate search, reports, launching and the ``capaboost-vtab`` command line.

The library (``capaboost_vision`` outside this package) never imports it. Importing this package imports nothing,
so the command line can parse its arguments before torch loads.
"""
