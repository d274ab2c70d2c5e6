"""
The Redis backplane: several nodes sharing rooms, sequences, histories and
presence through Redis.
"""
