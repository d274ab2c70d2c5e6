"""
The twistd plugin's options and makeService, listening, signals, logging
and the --workers master.
"""
