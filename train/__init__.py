"""train package of micronet-kit."""
