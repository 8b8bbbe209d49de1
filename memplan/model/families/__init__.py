"""model/families"""
