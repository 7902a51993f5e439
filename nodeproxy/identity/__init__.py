"""Workload identity: the CA, X.509-SVIDs, CA clients and the agent's certificate manager.

Import the submodules directly (``nodeproxy.identity.ca`` ...); this package module stays
light so that importing one part never pulls in aiohttp or the config loader.
"""
