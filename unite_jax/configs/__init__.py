"""The stage configs (ml_collections): base.py holds every key, stage1.py and stage2.py the UNITE recipe."""
