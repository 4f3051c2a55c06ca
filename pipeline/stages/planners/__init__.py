"""Planners: Description + JobOptions -> Plan."""
