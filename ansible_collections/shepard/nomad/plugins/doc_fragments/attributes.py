# -*- coding: utf-8 -*-
# Copyright: Shepard contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""The attributes (support of check mode, diff mode, platforms, action group) Shepard's modules share."""

from __future__ import annotations


class ModuleDocFragment:
    """Attribute values; the descriptions come from C(ansible.builtin.action_common_attributes).

    List these fragments before C(ansible.builtin.action_common_attributes): when a fragment is merged,
    the values already in the module's documentation win, so listed after it, its C(support: N/A) would.
    """

    # Every module: runs on POSIX hosts (shepard.nomad.attributes).
    DOCUMENTATION = r"""
attributes:
  platform:
    platforms: posix
"""

    # Modules that talk to Consul or Nomad, in the action group of the connection options
    # (shepard.nomad.attributes.action_group).
    ACTION_GROUP = r"""
attributes:
  action_group:
    support: full
    membership:
      - shepard.nomad.shepard
"""

    # Modules that only read (shepard.nomad.attributes.info_module).
    INFO_MODULE = r"""
attributes:
  check_mode:
    support: full
    details: Reads only; the same in check mode.
  diff_mode:
    support: none
"""
