# frozen_string_literal: true

# The Vagrant lab's settings (vagrant/settings.yaml), checked, and what each machine's
# provisioning scripts are given: the environment variables below, nothing else. Plain Ruby, no
# Vagrant: the Vagrantfile requires it, and tests/test_vagrant.py runs it with `ruby` to compare
# the environment with what the kubeadm configuration and manifests expect.

require "ipaddr"
require "securerandom"
require "yaml"

module KpgenLab
  # The repository inside the machines (an rsync copy of the host's checkout).
  GUEST_DIR = "/vagrant"

  # Left out of that copy: what the image build and the provisioning do not read.
  RSYNC_EXCLUDE = [
    ".git/", ".venv/", ".hypothesis/", ".mypy_cache/", ".pytest_cache/", ".ruff_cache/",
    "__pycache__/", "*.egg-info/", "build/", "dist/", "bench/", "tests/", ".vagrant/",
  ].freeze

  ROLES = %w[gateway control-plane worker].freeze
  PROXY_MODES = %w[nftables iptables].freeze
  TOKEN_FORMAT = /\A[a-z0-9]{6}\.[a-z0-9]{16}\z/.freeze
  TOKEN_ALPHABET = [*"a".."z", *"0".."9"].freeze

  class SettingsError < StandardError; end

  module_function

  def load(path)
    settings = YAML.safe_load(File.read(path))
    check(settings)
    settings
  end

  def dig!(settings, *keys)
    keys.reduce(settings) do |value, key|
      unless value.is_a?(Hash) && !value[key].nil?
        raise SettingsError, "settings.yaml: #{keys.join('.')} is missing"
      end

      value[key]
    end
  end

  def network(cidr, what)
    IPAddr.new(cidr)
  rescue IPAddr::Error
    raise SettingsError, "settings.yaml: #{what}: #{cidr.inspect} is not an address or network"
  end

  def check(settings)
    raise SettingsError, "settings.yaml: not a mapping" unless settings.is_a?(Hash)

    %w[name version].each { |key| dig!(settings, "box", key) }
    unless dig!(settings, "kubernetes", "version").to_s.match?(/\A\d+\.\d+\.\d+\z/)
      raise SettingsError, "settings.yaml: kubernetes.version: a full version, like 1.32.4"
    end
    dig!(settings, "kubernetes", "deb_revision")
    network(dig!(settings, "kubernetes", "pod_cidr"), "kubernetes.pod_cidr")
    network(dig!(settings, "kubernetes", "service_cidr"), "kubernetes.service_cidr")
    dig!(settings, "kubernetes", "api_server_port")
    unless dig!(settings, "cni", "name") == "calico"
      raise SettingsError, "settings.yaml: cni.name: the provisioning installs calico only"
    end
    unless dig!(settings, "cni", "version").to_s.match?(/\Av\d+\.\d+\.\d+\z/)
      raise SettingsError, "settings.yaml: cni.version: a release tag, like v3.29.3"
    end
    dig!(settings, "cni", "encapsulation")
    unless PROXY_MODES.include?(dig!(settings, "kpgen", "mode"))
      raise SettingsError, "settings.yaml: kpgen.mode: one of #{PROXY_MODES.join(', ')}"
    end
    check_nodes(settings)
  end

  def check_nodes(settings)
    lan = network(dig!(settings, "network", "cidr"), "network.cidr")
    %w[name libvirt_management_name].each { |key| dig!(settings, "network", key) }
    network(dig!(settings, "network", "libvirt_management_cidr"), "network.libvirt_management_cidr")
    %w[libvirt_host_ip external_ip].each do |key|
      address = network(dig!(settings, "network", key), "network.#{key}")
      raise SettingsError, "settings.yaml: network.#{key} is not in #{lan}" unless lan.include?(address)
    end
    all = nodes(settings)
    all.each do |node|
      %w[name role ip cpus memory].each do |key|
        raise SettingsError, "settings.yaml: nodes: #{node.inspect} has no #{key}" if node[key].nil?
      end
      raise SettingsError, "settings.yaml: #{node['name']}: role #{node['role']}?" unless ROLES.include?(node["role"])
      unless lan.include?(network(node["ip"], "#{node['name']}.ip"))
        raise SettingsError, "settings.yaml: #{node['name']}: #{node['ip']} is not in #{lan}"
      end
    end
    %w[name ip].each do |key|
      values = all.map { |node| node[key] }
      raise SettingsError, "settings.yaml: nodes: two with the same #{key}" unless values.uniq.size == values.size
    end
    unless all.count { |node| node["role"] == "control-plane" } == 1
      raise SettingsError, "settings.yaml: nodes: exactly one control-plane"
    end
    via = all.find { |node| node["name"] == dig!(settings, "network", "external_ip_via") }
    return if via && via["role"] == "worker"

    raise SettingsError, "settings.yaml: network.external_ip_via: the name of a worker"
  end

  def nodes(settings)
    list = dig!(settings, "nodes")
    raise SettingsError, "settings.yaml: nodes: a list" unless list.is_a?(Array) && !list.empty?

    list
  end

  def node(settings, name)
    nodes(settings).find { |n| n["name"] == name } or raise SettingsError, "no node #{name}"
  end

  # 10.20.30.0/24 -> 255.255.255.0, as Vagrant's private_network takes it.
  def netmask(settings)
    prefix = network(dig!(settings, "network", "cidr"), "network.cidr").prefix
    IPAddr.new("255.255.255.255").mask(prefix).to_s
  end

  # The environment of every provisioning script on the machine `node` (a settings entry).
  def env_for(settings, node, token)
    k8s = settings["kubernetes"]
    version = k8s["version"].to_s
    master = nodes(settings).find { |n| n["role"] == "control-plane" }
    via = node(settings, settings["network"]["external_ip_via"])
    {
      "LAB_DIR" => GUEST_DIR,
      "LAB_HOSTS" => nodes(settings).map { |n| "#{n['name']}=#{n['ip']}" }.join(" "),
      "NODE_NAME" => node["name"],
      "NODE_IP" => node["ip"].to_s,
      "NODE_ROLE" => node["role"],
      "API_ADDRESS" => master["ip"].to_s,
      "API_PORT" => k8s["api_server_port"].to_s,
      "KUBERNETES_VERSION" => version,
      "KUBERNETES_MINOR" => "v#{version.split('.')[0, 2].join('.')}",
      "KUBERNETES_DEB_VERSION" => "#{version}-#{k8s['deb_revision']}",
      "POD_CIDR" => k8s["pod_cidr"].to_s,
      "SERVICE_CIDR" => k8s["service_cidr"].to_s,
      "CALICO_VERSION" => settings["cni"]["version"].to_s,
      "CALICO_ENCAPSULATION" => settings["cni"]["encapsulation"].to_s,
      "KPGEN_MODE" => settings["kpgen"]["mode"].to_s,
      "EXTERNAL_IP" => settings["network"]["external_ip"].to_s,
      "EXTERNAL_IP_VIA" => via["ip"].to_s,
      "BOOTSTRAP_TOKEN" => token,
    }
  end

  # kubeadm's bootstrap token, with which the workers join: made once per checkout, kept with
  # Vagrant's own state (.vagrant/), never in the repository.
  def bootstrap_token(state_dir)
    path = File.join(state_dir, "kpgen-bootstrap-token")
    if File.exist?(path)
      token = File.read(path).strip
      return token if token.match?(TOKEN_FORMAT)
    end
    token = "#{random_chars(6)}.#{random_chars(16)}"
    Dir.mkdir(state_dir) unless File.directory?(state_dir)
    File.write(path, "#{token}\n", perm: 0o600)
    token
  end

  def random_chars(count)
    Array.new(count) { TOKEN_ALPHABET[SecureRandom.random_number(TOKEN_ALPHABET.size)] }.join
  end
end
