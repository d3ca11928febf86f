"""vtr.video"""
