"""The bottom layer: errors, registries, locations, plug-in loading, statistics and the record format.

Nothing here imports another part of ``bench``; every other group may import from here.
"""
