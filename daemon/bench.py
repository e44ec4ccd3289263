"""`chargeflow bench`: placeholder replaced below."""
