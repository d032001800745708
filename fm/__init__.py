"""omnisky.fm"""
