"""model/forward"""
