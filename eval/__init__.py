"""uniret.eval"""
