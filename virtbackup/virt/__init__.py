"""The libvirt side: the connection, domain and disk views, checkpoints, dirty bitmaps, QMP
passthrough, the key as a libvirt secret, the guest agent, and the XML libvirt is given."""
