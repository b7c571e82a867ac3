"""The client side of vfio-user: a trio client, the migration drivers, device descriptions.

Nothing here serves a device; everything here talks to a server over its socket.
"""
