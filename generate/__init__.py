"""omnisky.generate"""
