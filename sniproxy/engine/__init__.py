"""The data path: one edge-triggered event set, listeners, connections and their two directions, splice(2)."""
