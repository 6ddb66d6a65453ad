# The Shepard agent as a Nomad system job: one agent on every client node.
#
# raw_exec runs the agent on the host, so it reads the node's real Nomad data dir (a Docker or
# exec task would see only its own allocation). Enable the raw_exec plugin on the clients, install
# Shepard on each (e.g. `python3 -m venv /opt/shepard/venv && /opt/shepard/venv/bin/pip install shepard`),
# and keep the tokens in the Nomad variable nomad/jobs/shepard-agent (keys consul_token, nomad_token).
#
#   nomad job run -var nomad_data_dir=/opt/nomad/data examples/nomad/shepard-agent.nomad.hcl

variable "nomad_data_dir" {
  type        = string
  default     = "/opt/nomad/data"
  description = "The Nomad clients' data_dir (allocations are under alloc/)."
}

variable "shepard" {
  type        = string
  default     = "/opt/shepard/venv/bin/shepard"
  description = "The shepard executable on every client."
}

job "shepard-agent" {
  type        = "system"
  datacenters = ["*"]
  priority    = 80

  group "agent" {
    network {
      port "metrics" {
        static = 9464
      }
    }

    service {
      name     = "shepard-agent"
      port     = "metrics"
      provider = "consul"

      check {
        name     = "ready"
        type     = "http"
        path     = "/ready"
        interval = "10s"
        timeout  = "2s"
      }
    }

    task "agent" {
      driver = "raw_exec"

      config {
        command = var.shepard
        args    = ["agent", "--config", "${NOMAD_TASK_DIR}/shepard.yaml"]
      }

      # SIGTERM: finish a restart in flight (up to shutdown_timeout), release everything, exit 0.
      kill_signal  = "SIGTERM"
      kill_timeout = "45s"

      # The agent's config. A change reloads it (SIGHUP) instead of restarting the agent.
      template {
        destination   = "local/shepard.yaml"
        change_mode   = "signal"
        change_signal = "SIGHUP"
        data          = <<-EOT
          node_name: {{ env "node.unique.name" }}
          nomad_data_dir: ${var.nomad_data_dir}
          consul:
            address: http://{{ env "attr.unique.network.ip-address" }}:8500
          nomad:
            address: http://{{ env "attr.unique.network.ip-address" }}:4646
          metrics_address: {{ env "NOMAD_ADDR_metrics" }}
          shutdown_timeout: 30s
          log_format: json
          EOT
      }

      # Tokens as environment variables, from a Nomad variable only this job can read.
      template {
        destination = "secrets/tokens.env"
        env         = true
        change_mode = "restart"
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/shepard-agent" }}
          CONSUL_HTTP_TOKEN={{ .consul_token }}
          NOMAD_TOKEN={{ .nomad_token }}
          {{ end }}
          EOT
      }

      resources {
        cpu    = 100
        memory = 128
      }
    }
  }
}
